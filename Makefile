# The README's two commands, and the benchmarks.
.PHONY: serve test bench openapi

serve:
	python3 -m pip install -q -e . && gateway serve

test:
	./scripts/test

bench:
	python3 bench/v2_concurrency.py

openapi:
	gateway openapi --out openapi/openapi.json
