/*-------------------------------------------------------------------------
 *
 * paging.c
 *	  Reads an entity page by page.  Skip mode asks $top/$skip and advances
 *	  by the rows received until an empty page, so a server that silently
 *	  caps $top costs calls, never rows.  The first @odata.nextLink switches
 *	  the pull to link mode: links are followed verbatim (relative ones
 *	  resolved against the request that returned them) until a page has
 *	  none.  Dataverse pages only by link.
 *
 *	  Dataverse change tracking: a tracked pull asks odata.track-changes
 *	  on every page and keeps the last page's @odata.deltaLink; a delta
 *	  pull starts at a stored delta link, followed verbatim, and may find
 *	  it refused (a 4xx: the service no longer keeps those changes), which
 *	  ends the pull with nothing read so that the caller can pull it all.
 *
 *	  Guards: at most ciflow.max_pages pages, no link followed twice, no
 *	  two identical non-empty pages in a row (a server ignoring $skip), and
 *	  no link to another host.
 *
 *	  The pager hands out bodies, not parsed pages: the caller parses one
 *	  (straight into rows, load.c) and gives back what the page said
 *	  (CiflowPagerAccept), which sets the next page's address and puts its
 *	  request under way at once, so that its transfer overlaps the
 *	  caller's insert of the page before.  Two pages at most are held: the
 *	  one being inserted, as tuples, and the next one's body arriving.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/hashfn.h"
#include "lib/stringinfo.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"

#include "ciflow.h"
#include "http.h"
#include "odata.h"
#include "paging.h"

struct CiflowPager
{
	const CiflowConnection *conn;
	char	   *data_url;
	char	   *query;			/* options other than paging */
	const char *failmsg;
	CiflowCallStats *stats;
	MemoryContext page_cxt;		/* a page's request and body; reset before
								 * every request */
	char	   *page_url;		/* the request of the page in page_cxt */
	CiflowPendingRequest *pending;	/* in page_cxt; set while its request is
									 * under way (Accept began it) */
	uint64		page_hash;		/* of the body Fetch returned */
	bool		link_mode;
	char	   *next_url;		/* in link mode; in the pager's context */
	int64		skip;
	int			pages;
	bool		done;
	int64		count;
	uint64		prev_hash;
	HTAB	   *seen_links;		/* 64-bit hashes of followed links */
	bool		track_changes;	/* Prefer: odata.track-changes */
	bool		refusable;		/* the next request is a stored delta link */
	char	   *delta_link;		/* the last @odata.deltaLink; pager's context */
	char	   *refusal;		/* why the delta link was refused, or NULL */
};

CiflowPager *
CiflowPagerBegin(const CiflowConnection *conn, const char *entity,
				 const char *query, const char *failmsg, CiflowCallStats *stats)
{
	CiflowPager *p = palloc0(sizeof(CiflowPager));
	HASHCTL		ctl;

	p->conn = conn;
	p->data_url = CiflowDataUrl(conn, entity);
	p->query = pstrdup(query ? query : "");
	p->failmsg = failmsg;
	p->stats = stats;
	p->count = -1;
	p->page_cxt = AllocSetContextCreate(CurrentMemoryContext, "ciflow page",
										ALLOCSET_DEFAULT_SIZES);
	ctl.keysize = sizeof(uint64);
	ctl.entrysize = sizeof(uint64);
	ctl.hcxt = CurrentMemoryContext;
	p->seen_links = hash_create("ciflow followed links", 64, &ctl,
								HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	/* Dataverse has no $skip: its first page already asks by preference. */
	p->link_mode = (conn->flavor == CIFLOW_FLAVOR_DATAVERSE);
	return p;
}

void
CiflowPagerTrackChanges(CiflowPager *p)
{
	p->track_changes = true;
}

/* Replaces *slot by a copy of value that lives as long as the pager. */
static void
KeepString(CiflowPager *p, char **slot, const char *value)
{
	MemoryContext old = MemoryContextSwitchTo(GetMemoryChunkContext(p));

	if (*slot)
		pfree(*slot);
	*slot = pstrdup(value);
	MemoryContextSwitchTo(old);
}

void
CiflowPagerStartAt(CiflowPager *p, const char *delta_link)
{
	KeepString(p, &p->next_url, delta_link);
	p->link_mode = true;
	p->refusable = true;
	p->track_changes = true;
}

/* Dataverse's page size preference, and change tracking if asked for. */
static const char *
PagePrefer(const CiflowPager *p)
{
	const char *prefer = CiflowPreferHeader(p->conn, p->conn->page_size);

	if (!p->track_changes)
		return prefer;
	return prefer ? psprintf("odata.track-changes, %s", prefer) : "odata.track-changes";
}

static char *
PageUrl(CiflowPager *p)
{
	StringInfoData q;

	if (p->next_url != NULL)
		return p->next_url;
	initStringInfo(&q);
	appendStringInfoString(&q, p->query);
	if (!p->link_mode)
	{
		char		num[32];

		snprintf(num, sizeof(num), "%d", p->conn->page_size);
		CiflowAppendQuery(&q, "$top", num);
		snprintf(num, sizeof(num), INT64_FORMAT, p->skip);
		CiflowAppendQuery(&q, "$skip", num);
	}
	return CiflowUrlWithQuery(p->data_url, q.data);
}

static void
PagingError(CiflowPager *p, const char *detail)
{
	ereport(ERROR,
			(errcode(ERRCODE_PROTOCOL_VIOLATION),
			 errmsg("%s", p->failmsg),
			 errdetail("%s", detail)));
}

/*
 * Keeps a page's @odata.deltaLink, the place a later pull resumes from,
 * resolved like a nextLink (Dataverse sends absolute ones).
 */
static void
TakeDeltaLink(CiflowPager *p, const char *link, const char *request_url)
{
	char	   *resolved;

	if (link == NULL)
		return;
	resolved = CiflowResolveUrl(request_url, link);
	if (resolved == NULL)
		PagingError(p, psprintf("The server sent an unusable @odata.deltaLink on page %d.",
								p->pages));
	KeepString(p, &p->delta_link, resolved);
}

/* Accepts the page's nextLink, if any, as the next URL. */
static void
TakeNextLink(CiflowPager *p, const char *link, const char *request_url)
{
	char	   *resolved;
	char	   *origin = NULL;
	uint64		h;
	bool		found;

	if (link == NULL)
	{
		/* The end of a linked pull; in skip mode, only an empty page ends. */
		if (p->link_mode)
			p->done = true;
		p->next_url = NULL;
		return;
	}

	resolved = CiflowResolveUrl(request_url, link);
	if (resolved == NULL || !CiflowParseUrl(resolved, &origin))
		PagingError(p, psprintf("The server sent an unusable @odata.nextLink on page %d.",
								p->pages));
	if (strcmp(origin, p->conn->origin) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("%s", p->failmsg),
				 errdetail("The @odata.nextLink of page %d points to %s, not to the connection's host %s; it is not followed.",
						   p->pages, origin, p->conn->origin)));

	h = hash_bytes_extended((const unsigned char *) resolved, strlen(resolved), 0);
	(void) hash_search(p->seen_links, &h, HASH_ENTER, &found);
	if (found)
		PagingError(p, psprintf("The @odata.nextLink of page %d was already followed in this pull (a paging loop).",
								p->pages));

	KeepString(p, &p->next_url, resolved);
	p->link_mode = true;
}

/*
 * What tells two pages apart: their length and their first and last 16 kB.
 * A server that ignores $skip sends the same bytes again; pages of other
 * rows differ from their first row on.  (Hashing whole bodies cost 2 % of
 * a sync.)
 */
static uint64
PageDigest(const char *body, size_t len)
{
	size_t		n = Min(len, (size_t) 16384);
	uint64		h = hash_bytes_extended((const unsigned char *) body, (int) n, (uint64) len);

	return hash_bytes_extended((const unsigned char *) body + len - n, (int) n, h);
}

/*
 * Puts the next page's request under way.  What it needs lives in
 * page_cxt, which the page before no longer uses.
 */
static void
StartPage(CiflowPager *p)
{
	MemoryContext old;
	CiflowRequest *req;

	if (p->pages >= ciflow_settings.max_pages)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("%s", p->failmsg),
				 errdetail("The pull reached ciflow.max_pages (%d pages).",
						   ciflow_settings.max_pages),
				 errhint("Raise ciflow.max_pages or the connection's page_size.")));

	MemoryContextReset(p->page_cxt);
	old = MemoryContextSwitchTo(p->page_cxt);
	p->page_url = PageUrl(p);
	req = palloc0(sizeof(CiflowRequest));
	req->conn = p->conn;
	req->url = p->page_url;
	req->api_call = true;
	req->prefer = PagePrefer(p);
	req->failmsg = p->failmsg;
	req->not_found_hint = "Check the entity's name with ciflow.get_entities().";
	req->stats = p->stats;
	req->return_refusal = p->refusable;
	p->refusable = false;
	p->pending = CiflowRequestStart(req);
	MemoryContextSwitchTo(old);
}

bool
CiflowPagerFetch(CiflowPager *p, char **body, size_t *len)
{
	CiflowResponse resp;
	MemoryContext old;

	if (p->done)
		return false;
	if (p->pending == NULL)
		StartPage(p);
	old = MemoryContextSwitchTo(p->page_cxt);
	resp = CiflowRequestFinish(p->pending);
	p->pending = NULL;
	MemoryContextSwitchTo(old);
	if (resp.status >= 400)
	{
		/* Nothing was read: the caller pulls everything instead. */
		KeepString(p, &p->refusal, psprintf("HTTP status %ld: %s", resp.status,
											CiflowServiceMessage(resp.body, resp.len)));
		p->done = true;
		return false;
	}
	p->pages++;
	p->page_hash = PageDigest(resp.body, resp.len);
	*body = resp.body;
	*len = resp.len;
	return true;
}

void
CiflowPagerAccept(CiflowPager *p, const CiflowPageInfo *info)
{
	if (info->count >= 0)
		p->count = info->count;

	/* A server that ignores $skip would otherwise be read forever. */
	if (info->rows > 0 && p->pages > 1 && p->page_hash == p->prev_hash)
		PagingError(p, psprintf("Pages %d and %d are identical; the server seems to ignore $skip.",
								p->pages - 1, p->pages));
	p->prev_hash = p->page_hash;

	TakeNextLink(p, info->next_link, p->page_url);
	TakeDeltaLink(p, info->delta_link, p->page_url);
	if (!p->link_mode)
	{
		p->skip += info->rows;
		if (info->rows == 0)
			p->done = true;
	}

	/*
	 * The next page's transfer goes on while the caller inserts this one:
	 * its bytes wait in the socket until the caller fetches them.
	 */
	if (!p->done)
		StartPage(p);
}

int
CiflowPagerPages(const CiflowPager *p)
{
	return p->pages;
}

int64
CiflowPagerCount(const CiflowPager *p)
{
	return p->count;
}

const char *
CiflowPagerDeltaLink(const CiflowPager *p)
{
	return p->delta_link;
}

const char *
CiflowPagerRefusal(const CiflowPager *p)
{
	return p->refusal;
}

void
CiflowPagerEnd(CiflowPager *p)
{
	MemoryContextDelete(p->page_cxt);
	hash_destroy(p->seen_links);
	if (p->next_url)
		pfree(p->next_url);
	if (p->delta_link)
		pfree(p->delta_link);
	if (p->refusal)
		pfree(p->refusal);
	pfree(p->query);
	pfree(p);
}
