"""`python -m cxr.dedup`: exact and near-duplicate training images (`cxr.privacy.dedup`)."""

from cxr.privacy.dedup import main

if __name__ == "__main__":
    raise SystemExit(main())
