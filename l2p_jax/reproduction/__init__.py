"""The paper's experiments as data (`paper_grid`), the runner behind reproduce.py
(`grid_runner`) and its REPORT.md beside the published numbers (`paper_report`)."""
