"""The command groups of `lmforge` beyond the stages, one module each (`lmforge.cli` assembles them)."""
