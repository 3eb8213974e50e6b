"""The workflow report: tables, figures and the summary."""
