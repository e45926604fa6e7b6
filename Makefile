# ciflow: PGXS build.  `make && make install`, then CREATE EXTENSION ciflow.

MODULE_big = ciflow
OBJS = \
	src/ciflow.o \
	src/catalog.o \
	src/connection.o \
	src/http.o \
	src/auth.o \
	src/ratelimit.o \
	src/request.o \
	src/odata.o \
	src/edm.o \
	src/csdl.o \
	src/servicemeta.o \
	src/entitykeys.o \
	src/actions.o \
	src/paging.o \
	src/pageparse.o \
	src/convert.o \
	src/load.o \
	src/shape.o \
	src/target.o \
	src/apply.o \
	src/runs.o \
	src/sync.o \
	src/syncworker.o \
	src/events.o \
	src/monitor.o \
	src/jobs.o \
	src/launcher.o \
	src/delivery.o

EXTENSION = ciflow
DATA = sql/ciflow--0.1.sql sql/ciflow--0.1--0.2.sql sql/ciflow--0.2.sql
PGFILEDESC = "ciflow - Dynamics 365 Customer Insights in PostgreSQL"

# The regression tests need the emulator: tests/extension/test_regress.py runs
# them against a throwaway cluster and exports CIFLOW_EMULATOR_URL.
REGRESS = connections actions errors

PG_CONFIG ?= pg_config

# Server headers are system headers here, so -Wextra judges only ciflow's code.
# Hidden visibility: the library exports only what PGDLLEXPORT marks (the
# magic block, _PG_init, the ciflow_* SQL functions and worker entry points),
# so no symbol of ours can clash with another library's.
# libxml2 (the CSDL reader) is the one the server links; its headers are
# system headers too.
PG_CPPFLAGS = -I$(srcdir)/src -isystem $(shell $(PG_CONFIG) --includedir-server) $(shell curl-config --cflags) \
	$(patsubst -I%,-isystem %,$(shell xml2-config --cflags)) \
	'-DPGDLLEXPORT=__attribute__((visibility("default")))'
PG_CFLAGS = -Wall -Wextra -fvisibility=hidden
SHLIB_LINK = $(shell curl-config --libs) -ljansson $(shell xml2-config --libs)

PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)
