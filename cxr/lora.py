"""`python -m cxr.lora`: convert an adapter between the kohya and diffusers formats (`cxr.model.adapter_convert`)."""

from cxr.model.adapter_convert import main

if __name__ == "__main__":
    raise SystemExit(main())
