"""Online preference training: sampling from the current policy, scoring, and turning scores into training signal."""
