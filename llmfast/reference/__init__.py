"""Pure-PyTorch references: the judge in tests and the baseline in benchmarks.

Each function has the same signature as the public op it checks, works in float64, and favours clarity over
speed: it materialises whatever the fused kernel avoids.
"""
