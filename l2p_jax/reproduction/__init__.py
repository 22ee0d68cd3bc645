"""The paper's tables as data (`paper_tables`) and its published numbers
(`published_numbers`), the plan that measures them (`paper_grid`), the runner behind
reproduce.py (`grid_runner`) and its REPORT.md beside the published numbers
(`paper_report`)."""
