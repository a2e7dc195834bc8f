# Shortcuts for the two commands in the README (the scripts work without make too).
.PHONY: demo test bench models clean

demo:
	scripts/demo

test:
	scripts/test

bench:
	bash -c 'source scripts/env.sh dev && python scripts/bench_local.py'

models:
	.venv/bin/python scripts/build_models.py

clean:
	rm -rf .venv out .mypy_cache .ruff_cache .pytest_cache
