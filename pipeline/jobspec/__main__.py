"""``python -m pipeline.jobspec > configs/schema.json``: print the spec's JSON Schema."""

from __future__ import annotations

import json

from .load import json_schema


def main() -> None:
    """Print the schema editors validate job specs with."""
    print(json.dumps(json_schema(), indent=2))


if __name__ == "__main__":
    main()
