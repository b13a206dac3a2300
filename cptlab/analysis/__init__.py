"""Analysis of finished runs: runs as DataFrames (runs), metrics on them (metrics), the result tables of a
reproduction (results), the forgetting matrix of a sequence of datasets (sequences), the paper's findings
as rules (findings), laws fitted to runs that predict losses (laws, replay_law) and REPORT.md (report)."""
