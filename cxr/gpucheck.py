"""`python -m cxr.gpucheck`: the one prepared command that checks and measures the CUDA path (`cxr.perf.gpucheck`)."""

from cxr.perf.gpucheck import main

if __name__ == "__main__":
    raise SystemExit(main())
