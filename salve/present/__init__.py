"""Presentation: the pages (run report, latent browser, compare page), their figures, PNG
rendering and templates.

A layer above the method: it reads the method's results as plain data and draws them; nothing
in the rest of ``salve`` imports it (tests/test_layers.py), so the method runs without
matplotlib figures, Jinja2 or a browser in mind.
"""
