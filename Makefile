# ciflow: PGXS build.  `make && make install`, then CREATE EXTENSION ciflow.

MODULE_big = ciflow
OBJS = \
	src/ciflow.o \
	src/connection.o \
	src/http.o \
	src/auth.o \
	src/ratelimit.o \
	src/request.o \
	src/odata.o \
	src/actions.o \
	src/paging.o \
	src/convert.o \
	src/load.o \
	src/target.o \
	src/runs.o \
	src/sync.o \
	src/syncworker.o

EXTENSION = ciflow
DATA = sql/ciflow--0.1.sql
PGFILEDESC = "ciflow - Dynamics 365 Customer Insights in PostgreSQL"

# The regression tests need the emulator: tests/extension/test_regress.py runs
# them against a throwaway cluster and exports CIFLOW_EMULATOR_URL.
REGRESS = connections actions errors

PG_CONFIG ?= pg_config

# Server headers are system headers here, so -Wextra judges only ciflow's code.
PG_CPPFLAGS = -I$(srcdir)/src -isystem $(shell $(PG_CONFIG) --includedir-server) $(shell curl-config --cflags)
PG_CFLAGS = -Wall -Wextra
SHLIB_LINK = $(shell curl-config --libs) -ljansson

PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)
