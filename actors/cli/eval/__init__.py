"""`menders eval`: campaigns that measure how well the crew does (docs/architecture.md,
"Evaluation"). scenarios.py reads campaigns and scenarios, trial.py runs one trial,
campaign.py runs them all, records.py is what a trial leaves, report.py renders them."""
