#ifndef CNCCL_TEST_DOUBLE_H
#define CNCCL_TEST_DOUBLE_H

#include "CNCCL.h"

// A stand-in with ncclCommInitRank's C signature, for the tests: it records what it received, so
// a Swift call through the ncclCommInitRank_fn type can be checked to pass the 128-byte id by value.
ncclResult_t test_double_comm_init_rank(ncclComm_t *comm, int nranks, ncclUniqueId commId, int rank);

/// What the last call of test_double_comm_init_rank received: the id's bytes, nranks and rank.
void test_double_last_call(unsigned char id[128], int *nranks, int *rank);

#endif
