#!/usr/bin/env python
"""Write a random-weight checkpoint of a public model shape (see sq2trt/checkpoints.py):

    scripts/random_checkpoint.py --shape opt-1.3b --out DIR [--dtype float16|bfloat16] [--seed 0] [--outliers N]
"""
import sys

from sq2trt.checkpoints import main

if __name__ == "__main__":
    sys.exit(main())
