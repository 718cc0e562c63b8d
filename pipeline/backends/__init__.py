"""Backends: the Roboflow HTTP client (`roboflow`), its shared parsing (`base`), and the
embedded mock API (`mock`, `mock_image`) that rehearsals and tests run against."""
