"""`python -m cxr.bench`: where the time goes: the training step, input, cache and sampling (`cxr.perf.bench`)."""

from cxr.perf.bench import main

if __name__ == "__main__":
    main()
