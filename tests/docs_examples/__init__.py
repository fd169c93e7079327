"""Plugin modules shown whole in docs/plugins.md; tests/test_docs.py runs them."""
