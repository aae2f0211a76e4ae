# cowvm: `make run` boots the built-in guest, `make test` runs the whole suite.
CARGO ?= cargo

.PHONY: run test lint build bench fuzz clean

run:
	$(CARGO) build --release -p vmm
	./target/release/cowvm run --vcpus 2

build:
	$(CARGO) build --workspace --bins

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The end-to-end tests drive the built binaries, so build them first.
test: lint build
	$(CARGO) test --workspace

bench:
	$(CARGO) build --release --workspace --bins
	$(CARGO) run --release -p cowvm-tests --bin bench_vmm
	$(CARGO) run --release -p cowvm-tests --bin bench_snapshot
	$(CARGO) run --release -p cowvm-tests --bin bench_live
	$(CARGO) run --release -p cowvm-tests --bin bench_qcow
	$(CARGO) run --release -p cowvm-tests --bin bench_qcow_ops
	$(CARGO) run --release -p cowvm-tests --bin bench_clone
	$(CARGO) run --release -p cowvm-tests --bin bench_disk
	$(CARGO) run --release -p cowvm-tests --bin bench_report

fuzz:
	bash qcow/fuzz/run.sh

clean:
	$(CARGO) clean
