"""End-to-end study runner (resumable stages) and its report."""
