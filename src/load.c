/*-------------------------------------------------------------------------
 *
 * load.c
 *	  The rows of one page into the staging heap: the page parser hands
 *	  each field over as it reads it (pageparse.c), the field's column is
 *	  found by name and its value converted straight to a Datum by the
 *	  converter chosen for that column once per run (convert.c), and a
 *	  page's tuples go in with table_multi_insert the way COPY does.
 *
 *	  A page is parsed and converted first and inserted afterwards, so that
 *	  the next page's transfer can begin in between (see sync.c).  The
 *	  loader lives for a whole run (across its transactions); a page's
 *	  tuples live in a context reset for every page, so memory stays
 *	  bounded by one page.  Inserts skip the free space map: the heap only
 *	  grows at its end, so its physical order is the order of arrival, and
 *	  every row is also numbered in that order where the heap has a
 *	  CIFLOW_STAGE_SEQ column, so that of a key delivered twice the
 *	  version received last wins.  It writes only the heap it is given and
 *	  knows nothing of how that heap is published.
 *
 *	  Rows of a heap that becomes a new target at publish go in frozen, as
 *	  COPY FREEZE writes them.  The pages commit one by one, long before
 *	  the publish; with ordinary row versions a REPEATABLE READ snapshot
 *	  taken between two page commits would find, once the table has its
 *	  name, the pages committed before it and not the others.  Frozen, the
 *	  table is whole to every snapshot the moment it is named.  What this
 *	  costs COPY FREEZE's way (rows visible before their transaction
 *	  commits, and kept if it aborts) touches only the hidden heap under
 *	  its staging name, which every failure drops.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/heapam.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "common/hashfn.h"
#include "executor/tuptable.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"

#include "convert.h"
#include "load.h"

#define LOAD_BATCH 1000

/* A field name of the service, and the attribute it fills. */
typedef struct FieldEntry
{
	char	   *name;			/* the key: dynahash compares the pointer's
								 * string (see FieldHash) */
	int			attno;
} FieldEntry;

struct CiflowLoader
{
	const CiflowShape *shape;
	TupleDesc	desc;			/* the staging heap's, with dropped columns */
	int		   *source;			/* per attribute: shape column, or -1 */
	CiflowConverter *conv;		/* per attribute with a source */
	int			seq_attno;		/* CIFLOW_STAGE_SEQ's index, or -1 */
	int			deleted_attno;	/* CIFLOW_STAGE_DELETED's index, or -1 */
	int			key_attno;		/* the single key's index, or -1 */
	bool		deletions;		/* a delta pull: $deletedEntity entries */
	int			insert_options; /* table_multi_insert's */
	int64		seq;			/* rows numbered so far in the run */

	/*
	 * Fields by name.  Rows of one service list their fields in one order,
	 * so the attribute found at a position is tried first for the next row
	 * (one strcmp), and the hash table is asked only when that misses.
	 */
	HTAB	   *fields;
	const char **guess_name;
	int		   *guess_attno;
	int			nguesses;

	TupleTableSlot **slots;		/* one per row of the page */
	int			nslots;
	int			nrows;			/* rows of the page parsed last */
	MemoryContext cxt;
	MemoryContext page_cxt;

	/* the row being read */
	TupleTableSlot *slot;
	int			field_no;
	bool		row_deletion;
	char	   *row_id;			/* a deletion's "id", in page_cxt */
	JsonTokenType row_id_type;

	/* where we are, for the error context */
	int			page_no;
	int			row_no;
	int			attno;
};

static uint32
FieldHash(const void *key, Size keysize)
{
	const char *name = *(const char *const *) key;

	(void) keysize;
	return string_hash(name, strlen(name) + 1);
}

static int
FieldMatch(const void *key1, const void *key2, Size keysize)
{
	(void) keysize;
	return strcmp(*(const char *const *) key1, *(const char *const *) key2);
}

CiflowLoader *
CiflowLoaderCreate(const CiflowShape *shape, Relation staging, bool frozen,
				   MemoryContext cxt)
{
	MemoryContext old = MemoryContextSwitchTo(cxt);
	CiflowLoader *ld = palloc0(sizeof(CiflowLoader));
	HASHCTL		hctl;
	int			i;

	ld->shape = shape;
	ld->cxt = cxt;
	ld->insert_options = TABLE_INSERT_SKIP_FSM | (frozen ? TABLE_INSERT_FROZEN : 0);
	ld->desc = CreateTupleDescCopy(RelationGetDescr(staging));
	ld->source = palloc(sizeof(int) * ld->desc->natts);
	ld->conv = palloc0(sizeof(CiflowConverter) * ld->desc->natts);
	ld->page_cxt = AllocSetContextCreate(cxt, "ciflow load page",
										 ALLOCSET_DEFAULT_SIZES);
	memset(&hctl, 0, sizeof(hctl));
	hctl.keysize = sizeof(char *);
	hctl.entrysize = sizeof(FieldEntry);
	hctl.hash = FieldHash;
	hctl.match = FieldMatch;
	hctl.hcxt = cxt;
	ld->fields = hash_create("ciflow load fields", Max(shape->ncolumns, 8), &hctl,
							 HASH_ELEM | HASH_FUNCTION | HASH_COMPARE | HASH_CONTEXT);
	ld->nguesses = shape->ncolumns * 2 + 8;
	ld->guess_name = palloc0(sizeof(char *) * ld->nguesses);
	ld->guess_attno = palloc0(sizeof(int) * ld->nguesses);

	/*
	 * Columns are matched by name; others (dropped or the user's own) stay
	 * NULL.
	 */
	ld->seq_attno = -1;
	ld->deleted_attno = -1;
	ld->key_attno = -1;
	for (i = 0; i < ld->desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(ld->desc, i);
		int			c;

		ld->source[i] = -1;
		if (att->attisdropped)
			continue;
		if (strcmp(NameStr(att->attname), CIFLOW_STAGE_SEQ) == 0)
			ld->seq_attno = i;
		if (strcmp(NameStr(att->attname), CIFLOW_STAGE_DELETED) == 0)
			ld->deleted_attno = i;
		for (c = 0; c < shape->ncolumns; c++)
		{
			if (strcmp(NameStr(att->attname), shape->columns[c].name) == 0)
			{
				FieldEntry *entry;
				char	   *name = shape->columns[c].remote_name;

				ld->source[i] = c;
				CiflowConverterInit(&ld->conv[i], att->atttypid, att->atttypmod, cxt);
				entry = hash_search(ld->fields, &name, HASH_ENTER, NULL);
				entry->attno = i;
				if (shape->columns[c].is_key)
					ld->key_attno = i;
				break;
			}
		}
	}
	MemoryContextSwitchTo(old);
	return ld;
}

void
CiflowLoaderAcceptDeletions(CiflowLoader *ld, bool accept)
{
	if (accept && ld->shape->nkeys != 1)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("entity \"%s\" has %d key columns; a delta link names a deleted row by one",
						ld->shape->entity, ld->shape->nkeys)));
	ld->deletions = accept;
}

static void
LoadErrorContext(void *arg)
{
	CiflowLoader *ld = (CiflowLoader *) arg;

	if (ld->attno >= 0 && ld->source[ld->attno] >= 0)
		errcontext("attribute \"%s\" (column %s) of row %d on page %d",
				   ld->shape->columns[ld->source[ld->attno]].remote_name,
				   ld->shape->columns[ld->source[ld->attno]].name,
				   ld->row_no, ld->page_no);
	else
		errcontext("row %d on page %d", ld->row_no, ld->page_no);
}

/* The attribute a field fills, or -1 for a field that is no column's. */
static int
FieldAttribute(CiflowLoader *ld, const char *field)
{
	int			pos = ld->field_no++;
	FieldEntry *entry;

	if (pos < ld->nguesses && ld->guess_name[pos] != NULL &&
		strcmp(ld->guess_name[pos], field) == 0)
		return ld->guess_attno[pos];
	entry = hash_search(ld->fields, &field, HASH_FIND, NULL);
	if (entry == NULL)
		return -1;
	if (pos < ld->nguesses)
	{
		ld->guess_name[pos] = entry->name;
		ld->guess_attno[pos] = entry->attno;
	}
	return entry->attno;
}

static void
RowStart(void *arg)
{
	CiflowLoader *ld = (CiflowLoader *) arg;
	TupleTableSlot *slot;

	if (ld->nrows == ld->nslots)
	{
		MemoryContext old = MemoryContextSwitchTo(ld->cxt);
		int			n = Max(ld->nslots * 2, 64);

		ld->slots = ld->slots ? repalloc(ld->slots, sizeof(TupleTableSlot *) * n) :
			palloc(sizeof(TupleTableSlot *) * n);
		while (ld->nslots < n)
			ld->slots[ld->nslots++] = MakeSingleTupleTableSlot(ld->desc, &TTSOpsHeapTuple);
		MemoryContextSwitchTo(old);
	}
	/* Emptied when the page began (CiflowLoaderParse). */
	slot = ld->slot = ld->slots[ld->nrows];
	memset(slot->tts_values, 0, sizeof(Datum) * ld->desc->natts);
	memset(slot->tts_isnull, true, sizeof(bool) * ld->desc->natts);
	ld->row_no = ld->nrows + 1;
	ld->field_no = 0;
	ld->row_deletion = false;
	ld->row_id = NULL;
}

/* A delta link's deletion: {"@odata.context": ".../$deletedEntity", "id": ...}. */
static void
NoteDeletion(CiflowLoader *ld, const char *field, char *token, JsonTokenType type)
{
	static const char suffix[] = "$deletedEntity";

	if (token == NULL)
		return;
	if (strcmp(field, "@odata.context") == 0)
	{
		size_t		len = strlen(token);

		ld->row_deletion = len >= sizeof(suffix) - 1 &&
			strcmp(token + len - (sizeof(suffix) - 1), suffix) == 0;
	}
	else if (strcmp(field, "id") == 0)
	{
		ld->row_id = MemoryContextStrdup(ld->page_cxt, token);
		ld->row_id_type = type;
	}
}

static void
FieldScalar(void *arg, const char *field, char *token, JsonTokenType type)
{
	CiflowLoader *ld = (CiflowLoader *) arg;
	int			attno;

	if (ld->deletions)
		NoteDeletion(ld, field, token, type);
	attno = FieldAttribute(ld, field);
	if (attno < 0)
		return;
	ld->slot->tts_isnull[attno] = (token == NULL);
	if (token != NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(ld->page_cxt);

		ld->attno = attno;
		ld->slot->tts_values[attno] = ld->conv[attno].fn(&ld->conv[attno], token, type);
		ld->attno = -1;
		MemoryContextSwitchTo(old);
	}
}

static void
FieldComposite(void *arg, const char *field, const char *json, int len)
{
	CiflowLoader *ld = (CiflowLoader *) arg;
	int			attno = FieldAttribute(ld, field);
	MemoryContext old;

	if (attno < 0)
		return;
	old = MemoryContextSwitchTo(ld->page_cxt);
	ld->attno = attno;
	ld->slot->tts_values[attno] = CiflowConvertComposite(&ld->conv[attno], json, len);
	ld->slot->tts_isnull[attno] = false;
	ld->attno = -1;
	MemoryContextSwitchTo(old);
}

/* A deletion is staged as its key alone, marked deleted. */
static void
FillDeletion(CiflowLoader *ld)
{
	TupleTableSlot *slot = ld->slot;
	int			k = ld->key_attno;
	MemoryContext old;

	memset(slot->tts_isnull, true, sizeof(bool) * ld->desc->natts);
	if (ld->row_id == NULL || k < 0)
		return;					/* the key check below reports it */
	old = MemoryContextSwitchTo(ld->page_cxt);
	ld->attno = k;
	slot->tts_values[k] = ld->conv[k].fn(&ld->conv[k], ld->row_id, ld->row_id_type);
	slot->tts_isnull[k] = false;
	ld->attno = -1;
	MemoryContextSwitchTo(old);
	if (ld->deleted_attno >= 0)
	{
		slot->tts_values[ld->deleted_attno] = BoolGetDatum(true);
		slot->tts_isnull[ld->deleted_attno] = false;
	}
}

static void
RowEnd(void *arg)
{
	CiflowLoader *ld = (CiflowLoader *) arg;
	TupleTableSlot *slot = ld->slot;
	bool		deletion = ld->deletions && ld->row_deletion;
	int			i;

	if (deletion)
		FillDeletion(ld);
	if (ld->seq_attno >= 0)
	{
		slot->tts_values[ld->seq_attno] = Int64GetDatum(++ld->seq);
		slot->tts_isnull[ld->seq_attno] = false;
	}
	for (i = 0; i < ld->desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(ld->desc, i);
		int			c = ld->source[i];

		/* A deletion fills its key alone. */
		if (slot->tts_isnull[i] &&
			((att->attnotnull && !deletion) || (c >= 0 && ld->shape->columns[c].is_key)))
			ereport(ERROR,
					(errcode(ERRCODE_NOT_NULL_VIOLATION),
					 errmsg("null value in column \"%s\" of entity \"%s\"",
							NameStr(att->attname), ld->shape->entity),
					 errdetail("Key columns and NOT NULL columns need a value in every row.")));
	}
	ExecStoreVirtualTuple(slot);
	ld->nrows++;
}

void
CiflowLoaderParse(CiflowLoader *ld, char *body, size_t len, int page_no,
				  const char *failmsg, CiflowPageInfo *info)
{
	ErrorContextCallback errcb;
	CiflowRowSink sink;
	MemoryContext old;
	int			i;

	/* The tuples of the page before were inserted: their memory goes. */
	for (i = 0; i < ld->nrows; i++)
		ExecClearTuple(ld->slots[i]);
	ld->nrows = 0;
	MemoryContextReset(ld->page_cxt);
	old = MemoryContextSwitchTo(ld->page_cxt);

	ld->page_no = page_no;
	ld->row_no = 0;
	ld->attno = -1;
	errcb.callback = LoadErrorContext;
	errcb.arg = ld;
	errcb.previous = error_context_stack;
	error_context_stack = &errcb;

	memset(&sink, 0, sizeof(sink));
	sink.arg = ld;
	sink.row_start = RowStart;
	sink.scalar = FieldScalar;
	sink.composite = FieldComposite;
	sink.row_end = RowEnd;
	CiflowParsePage(body, len, &sink, info, failmsg);

	error_context_stack = errcb.previous;
	MemoryContextSwitchTo(old);
}

int
CiflowLoaderInsert(CiflowLoader *ld, Relation staging)
{
	BulkInsertState bistate;
	CommandId	cid = GetCurrentCommandId(true);
	int			done;

	if (ld->nrows == 0)
		return 0;
	bistate = GetBulkInsertState();
	for (done = 0; done < ld->nrows; done += LOAD_BATCH)
		table_multi_insert(staging, ld->slots + done, Min(LOAD_BATCH, ld->nrows - done),
						   cid, ld->insert_options, bistate);
	FreeBulkInsertState(bistate);
	return ld->nrows;
}
