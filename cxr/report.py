"""`python -m cxr.report`: the release report: one HTML page and JSON (`cxr.privacy.report`)."""

from cxr.privacy.report import main

if __name__ == "__main__":
    raise SystemExit(main())
