"""The only package that knows the others: grid file → specs → plan → execution → tracking → reports."""
