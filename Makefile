.PHONY: install test lint fmt compare embedded

install:
	pip install torch==2.13.0
	pip install -e ".[test]"

test:
	python -m pytest -q

lint:
	ruff check src tests scripts benchmarks
	ruff format --check src tests scripts benchmarks

fmt:
	ruff check --fix src tests scripts benchmarks
	ruff format src tests scripts benchmarks

compare:
	tuneoff compare

embedded:
	python scripts/build_embedded.py
