"""pacs-ai training: split, train, evaluate, calibrate, compare, cam-review and export fracture classifiers.

Run ``python -m training --help`` (or ``pacs-ai-train --help``).
"""
