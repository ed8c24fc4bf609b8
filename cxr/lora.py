"""`python -m cxr.lora`: convert an adapter between the kohya and diffusers formats (`cxr.model.adapter_files`)."""

from cxr.model.adapter_files import main

if __name__ == "__main__":
    raise SystemExit(main())
