"""`python -m cxr.audit`: the memorization audit: every sample against every training image (`cxr.privacy.audit`)."""

from cxr.privacy.audit import main

if __name__ == "__main__":
    raise SystemExit(main())
