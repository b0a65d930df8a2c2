import os
import sys

# Tests import the top-level modules (model.py, data.py, ...) the way train.py does.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
