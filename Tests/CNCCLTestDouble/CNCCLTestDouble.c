#include "CNCCLTestDouble.h"
#include <string.h>

static unsigned char test_double_last_id[128];
static int test_double_last_nranks = -1;
static int test_double_last_rank = -1;

ncclResult_t test_double_comm_init_rank(ncclComm_t *comm, int nranks, ncclUniqueId commId, int rank) {
    memcpy(test_double_last_id, commId.internal, sizeof commId.internal);
    test_double_last_nranks = nranks;
    test_double_last_rank = rank;
    *comm = (ncclComm_t)0;
    return 0;
}

void test_double_last_call(unsigned char id[128], int *nranks, int *rank) {
    memcpy(id, test_double_last_id, sizeof test_double_last_id);
    *nranks = test_double_last_nranks;
    *rank = test_double_last_rank;
}
