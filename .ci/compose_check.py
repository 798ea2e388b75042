"""deploy/compose.yaml, offline: the Compose Specification's JSON schema, pinned images, mounted files.

- the file validates against .ci/compose-spec.json (schema/compose-spec.json of
  github.com/compose-spec/compose-spec, vendored: no Docker engine or network needed);
- every image that is pulled (not built here) names an explicit version tag, not `latest`;
- every relative bind-mount source exists (a missing file would become an empty directory).

It does not start anything: whether the images accept their config files is not checked here.

Usage: compose_check.py COMPOSE_FILE SCHEMA_FILE
"""

import json
import sys
from pathlib import Path

import jsonschema
import yaml


def main() -> int:
    compose_file, schema_file = Path(sys.argv[1]), Path(sys.argv[2])
    doc = yaml.safe_load(compose_file.read_text())
    schema = json.loads(schema_file.read_text())
    errors = []
    validator = jsonschema.Draft7Validator(schema)
    for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        path = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        errors.append(f"{path}: {e.message}")
    for name, svc in (doc.get("services") or {}).items():
        image = svc.get("image")
        if image and not svc.get("build"):
            ref = image.split("@", 1)[0]
            tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else None
            if "@" not in image and (tag is None or tag == "latest"):
                errors.append(f"services.{name}.image: {image!r} is not pinned to a version tag")
        for vol in svc.get("volumes") or []:
            src = vol.get("source") if isinstance(vol, dict) else str(vol).split(":", 1)[0]
            if src and src.startswith("."):
                if not (compose_file.parent / src).exists():
                    errors.append(f"services.{name}.volumes: {src} does not exist")
    for e in errors:
        print(f"FAIL: {compose_file}: {e}", file=sys.stderr)
    if errors:
        return 1
    print(f"ok: {compose_file} ({len(doc.get('services') or {})} services)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
