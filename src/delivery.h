/*-------------------------------------------------------------------------
 *
 * delivery.h
 *	  Event deliveries: sinks, the outbox and the delivery pass.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CIFLOW_DELIVERY_H
#define CIFLOW_DELIVERY_H

/*
 * Records one pending delivery of the event per matching sink, in the
 * caller's transaction (events.c calls it right after inserting the event),
 * so that the deliveries commit or roll back with it.
 */
extern void CiflowDeliveryEnqueue(int64 event_id);

/*
 * One delivery pass: claims the due head delivery of each sink, sends them
 * concurrently (each bounded by ciflow.connect_timeout and
 * ciflow.request_timeout), records every outcome and goes on with the next
 * head of a sink whose delivery is done, at most once per delivery per
 * pass.  No transaction is open during a transfer.
 *
 * own_transactions: true in a background worker outside any transaction
 * (the pass starts and commits its own); false in a non-atomic procedure
 * call (ciflow.deliver), which commits through SPI.  *attempted gets the
 * number of deliveries attempted.
 */
extern void CiflowDeliveryPass(bool own_transactions, int *attempted);

#endif							/* CIFLOW_DELIVERY_H */
