"""``python -m pipeline.spec > configs/schema.json``: print the spec's JSON Schema."""

from __future__ import annotations

import json

from .load import json_schema

print(json.dumps(json_schema(), indent=2))
