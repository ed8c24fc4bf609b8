"""`python -m cxr.select`: lists of normal frontal images from public chest X-ray datasets (`cxr.data.select`)."""

from cxr.data.select import main

if __name__ == "__main__":
    raise SystemExit(main())
