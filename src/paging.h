/*-------------------------------------------------------------------------
 *
 * paging.h
 *	  Reads an entity page by page: $top/$skip, or the server's nextLink.
 *	  The next page's transfer begins while the caller works on the last.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_PAGING_H
#define CIFLOW_PAGING_H

#include "connection.h"
#include "pageparse.h"
#include "request.h"

typedef struct CiflowPager CiflowPager;

/*
 * query holds the options other than paging, already encoded ("" for none).
 * failmsg is the primary message of every error the pull raises.
 */
extern CiflowPager *CiflowPagerBegin(const CiflowConnection *conn,
									 const char *entity, const char *query,
									 const char *failmsg, CiflowCallStats *stats);

/*
 * The next page's body (NUL-terminated at *len), or false when the pull is
 * complete.  Outside a transaction: it may wait for the transfer.  The
 * body lives until CiflowPagerAccept; the caller may write it (a parse
 * ends its strings in place).
 */
extern bool CiflowPagerFetch(CiflowPager *pager, char **body, size_t *len);

/*
 * What the page Fetch returned said, once it is parsed: advances the pull
 * and starts the next page's request.  Outside a transaction (the call
 * limit may make it wait); the body is gone afterwards.
 */
extern void CiflowPagerAccept(CiflowPager *pager, const CiflowPageInfo *info);

/* Pages fetched so far (the one being worked on included). */
extern int	CiflowPagerPages(const CiflowPager *pager);

/* The server's @odata.count, or -1 when it sent none. */
extern int64 CiflowPagerCount(const CiflowPager *pager);

/*
 * Dataverse change tracking.  TrackChanges, before the first page: every
 * page asks odata.track-changes, and the last one carries the delta link.
 * StartAt: the pull starts at a stored delta link instead (tracked too);
 * if the service refuses it, CiflowPagerNext returns NULL at once and
 * CiflowPagerRefusal says why.
 */
extern void CiflowPagerTrackChanges(CiflowPager *pager);
extern void CiflowPagerStartAt(CiflowPager *pager, const char *delta_link);

/* The last @odata.deltaLink received, or NULL; owned by the pager. */
extern const char *CiflowPagerDeltaLink(const CiflowPager *pager);

/* Why the stored delta link was refused, or NULL; owned by the pager. */
extern const char *CiflowPagerRefusal(const CiflowPager *pager);

extern void CiflowPagerEnd(CiflowPager *pager);

#endif							/* CIFLOW_PAGING_H */
