#!/usr/bin/env python
"""Run a trained rev_det detector on your own images or video (``python -m rev_det.predict``)."""

import sys

from rev_det.predict import main

if __name__ == "__main__":
    sys.exit(main())
