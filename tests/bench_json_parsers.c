/*
 * bench_json_parsers.c: jansson's json_loadb (a document tree) against
 * PostgreSQL's pg_parse_json (callbacks, no tree) on one page of an entity,
 * the measurement behind src/pageparse.c's choice.  Built and run by
 * tests/bench_json_parsers.py (frontend build: libpgcommon, libpgport).
 *
 *	  bench_json_parsers PAGE_FILE ITERATIONS
 *
 * Prints MB/s for: jansson; pg_parse_json with field and scalar callbacks
 * and de-escaped strings (the obvious use); the lexer alone, without
 * de-escaped strings (what pageparse.c asks of it).
 */
#include "postgres_fe.h"

#include <time.h>
#include <jansson.h>

#include "common/jsonapi.h"
#include "mb/pg_wchar.h"

static long fields;

static double
Now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static void
FieldStart(void *state, char *fname, bool isnull)
{
	(void) state;
	(void) isnull;
	fields++;
	free(fname);
}

static void
Scalar(void *state, char *token, JsonTokenType type)
{
	(void) state;
	(void) type;
	free(token);
}

static void
FreeLex(JsonLexContext *lex)
{
	if (lex->strval)
	{
		free(lex->strval->data);
		free(lex->strval);
	}
	free(lex);
}

static void
PgParse(char *buf, long n, bool escapes, JsonSemAction *sem)
{
	JsonLexContext *lex = makeJsonLexContextCstringLen(buf, (int) n, PG_UTF8, escapes);

	if (pg_parse_json(lex, sem) != JSON_SUCCESS)
	{
		fprintf(stderr, "not JSON\n");
		exit(1);
	}
	FreeLex(lex);
}

int
main(int argc, char **argv)
{
	FILE	   *f;
	long		n;
	char	   *buf;
	int			iters;
	int			i;
	double		t0,
				t1,
				t2,
				t3;
	JsonSemAction callbacks = {0};
	JsonSemAction none = {0};

	if (argc != 3 || (f = fopen(argv[1], "rb")) == NULL)
	{
		fprintf(stderr, "usage: %s PAGE_FILE ITERATIONS\n", argv[0]);
		return 2;
	}
	fseek(f, 0, SEEK_END);
	n = ftell(f);
	fseek(f, 0, SEEK_SET);
	buf = malloc(n + 1);
	if (fread(buf, 1, n, f) != (size_t) n)
		return 1;
	buf[n] = '\0';
	iters = atoi(argv[2]);
	callbacks.object_field_start = FieldStart;
	callbacks.scalar = Scalar;

	t0 = Now();
	for (i = 0; i < iters; i++)
	{
		json_error_t err;

		json_decref(json_loadb(buf, n, 0, &err));
	}
	t1 = Now();
	for (i = 0; i < iters; i++)
		PgParse(buf, n, true, &callbacks);
	t2 = Now();
	for (i = 0; i < iters; i++)
		PgParse(buf, n, false, &none);
	t3 = Now();
	printf("page of %ld bytes, %ld fields\n", n, fields / iters);
	printf("jansson json_loadb (tree)             %7.1f MB/s\n", n * iters / 1e6 / (t1 - t0));
	printf("pg_parse_json, callbacks, de-escaped  %7.1f MB/s\n", n * iters / 1e6 / (t2 - t1));
	printf("pg_parse_json, lexer only             %7.1f MB/s\n", n * iters / 1e6 / (t3 - t2));
	return 0;
}
