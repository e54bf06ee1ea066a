# The README's two commands, and the benchmarks.
.PHONY: serve test bench openapi

serve:
	python3 -m pip install -q -e . && gateway serve

test:
	./scripts/test

bench:
	python3 bench/v2_concurrency.py
	python3 bench/voice_assistants.py
	python3 bench/voiceflow_actions.py
	python3 bench/carrier_calls.py
	python3 bench/speech_rtf.py
	python3 bench/speech_latency.py
	python3 bench/stt_saturation.py
	python3 bench/fuzz_parsers.py --workers 2
	python3 bench/slowloris.py
	python3 bench/turn_overhead.py
	python3 bench/ssml_linear.py

openapi:
	gateway openapi --out openapi/openapi.json
