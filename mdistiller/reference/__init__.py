"""Published numbers shipped with the package (CI and users have no access to the shared reference folder)."""

import os

PAPER_RESULTS_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper_results.csv")
# The offline proxy tables: the same columns, no published number (top1 empty); rows run like published cells.
PROXY_TABLES_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "proxy_tables.csv")
# KD++ table 3 (COCO detection): the number is AP, with AP50 and AP75 beside it.
DETECTION_RESULTS_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "detection_results.csv")
