"""`python -m cxr.evaluate`: FID, KID, MS-SSIM diversity and intensity statistics (`cxr.privacy.evaluate`)."""

from cxr.privacy.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
