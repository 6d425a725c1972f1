"""Typed functions over SQL. Queries are named constants beside the function that runs them;
the schema itself lives only in sql/."""
