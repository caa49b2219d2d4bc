"""Products: tables, maps and plots made from data sets and trained runs."""
