#ifndef CNCCL_H
#define CNCCL_H

// NCCL's types and the signatures of the entry points Phalanx calls, written out from nccl.h
// (NCCL 2.x) so that Swift can call pointers found with dlsym through C function types. Nothing
// here is linked: libnccl.so.2 is opened at run time (PhalanxCUDA/NCCL.swift).
//
// Why a C header: ncclCommInitRank takes the 128-byte ncclUniqueId BY VALUE. Declared here it is
// a C struct, and Swift passes it by the C calling convention (on x86-64, in memory on the stack);
// a Swift tuple in a @convention(c) type has no such guarantee.

#include <stddef.h>

/// The rendezvous token made by ncclGetUniqueId on one rank and handed to every other rank.
typedef struct { char internal[128]; } ncclUniqueId;

/// An NCCL communicator (opaque).
typedef struct ncclComm *ncclComm_t;
/// A CUDA stream: the driver's CUstream and the runtime's cudaStream_t are the same pointer.
typedef struct CUstream_st *cudaStream_t;

/// ncclResult_t: ncclSuccess 0, ncclUnhandledCudaError 1, ncclSystemError 2, ncclInternalError 3,
/// ncclInvalidArgument 4, ncclInvalidUsage 5, ncclRemoteError 6, ncclInProgress 7.
typedef int ncclResult_t;
/// ncclDataType_t: ncclInt8 0, ncclUint8 1, ncclInt32 2, ncclUint32 3, ncclInt64 4, ncclUint64 5,
/// ncclFloat16 6, ncclFloat32 7, ncclFloat64 8, ncclBfloat16 9.
typedef int ncclDataType_t;
/// ncclRedOp_t: ncclSum 0, ncclProd 1, ncclMax 2, ncclMin 3, ncclAvg 4 (NCCL 2.10 and later).
typedef int ncclRedOp_t;

typedef ncclResult_t (*ncclGetVersion_fn)(int *version);
typedef ncclResult_t (*ncclGetUniqueId_fn)(ncclUniqueId *uniqueId);
typedef ncclResult_t (*ncclCommInitRank_fn)(ncclComm_t *comm, int nranks, ncclUniqueId commId, int rank);
typedef ncclResult_t (*ncclAllReduce_fn)(const void *sendbuff, void *recvbuff, size_t count, ncclDataType_t datatype,
                                         ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream);
typedef ncclResult_t (*ncclReduceScatter_fn)(const void *sendbuff, void *recvbuff, size_t recvcount,
                                             ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm,
                                             cudaStream_t stream);
typedef ncclResult_t (*ncclAllGather_fn)(const void *sendbuff, void *recvbuff, size_t sendcount,
                                         ncclDataType_t datatype, ncclComm_t comm, cudaStream_t stream);
typedef ncclResult_t (*ncclBroadcast_fn)(const void *sendbuff, void *recvbuff, size_t count, ncclDataType_t datatype,
                                         int root, ncclComm_t comm, cudaStream_t stream);
typedef ncclResult_t (*ncclGroupStart_fn)(void);
typedef ncclResult_t (*ncclGroupEnd_fn)(void);
typedef ncclResult_t (*ncclCommGetAsyncError_fn)(ncclComm_t comm, ncclResult_t *asyncError);
typedef ncclResult_t (*ncclCommAbort_fn)(ncclComm_t comm);
typedef ncclResult_t (*ncclCommDestroy_fn)(ncclComm_t comm);
typedef const char *(*ncclGetErrorString_fn)(ncclResult_t result);

#endif
