import os
import sys

# Test modules import shared helpers from each other (e.g. test_engine.make_stack).
sys.path.insert(0, os.path.dirname(__file__))
