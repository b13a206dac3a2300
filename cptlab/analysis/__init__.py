"""Analysis of finished runs: runs as DataFrames (runs), metrics on them (metrics), the result tables of a
reproduction (results), the paper's findings as rules (findings) and REPORT.md (report)."""
