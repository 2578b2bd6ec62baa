"""qlora_nb: the tested helper package behind the qlora-workbook notebooks.

Each module does one thing; notebooks import them instead of copying code.
"""

__version__ = "0.1.0"
