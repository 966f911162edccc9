import PhalanxCUDA
import PhalanxLayers
import PhalanxRuntime
import Testing

/// Host-side planning and layouts of the CUDA backend (no GPU needed).
@Suite("CUDA backend: work plans, layer layout, cuBLAS loading (no GPU needed)")
struct PlanningTests {
    @Test("the automatic chunk fills one wave; a fixed chunk is clamped; threads and blocks add up")
    func chunkPlan() {
        // 1 x 32768 rows, 128 heads x 4 lanes: 2048 blocks, 512 lanes per row.
        let wave = 132 * 3 * 128
        let plan = ChunkPlan(batch: 1, length: 32768, blockLength: 16, lanesPerRow: 512, threadsPerBlock: 128, residentThreads: wave)
        #expect(plan.chunkBlocks == 21)  // ceil(2048 * 512 / 50688)
        #expect(plan.threads == 98 * 512)  // ceil(2048 / 21) chunks
        #expect(plan.gridBlocks == 392)
        #expect(plan.threads <= wave)
        // Work smaller than a wave: one block per thread.
        #expect(ChunkPlan(batch: 2, length: 100, blockLength: 16, lanesPerRow: 12, threadsPerBlock: 128, residentThreads: wave).chunkBlocks == 1)
        // A fixed chunk longer than the sequence is clamped to it; the partial block counts.
        let fixed = ChunkPlan(batch: 3, length: 33, blockLength: 16, lanesPerRow: 8, threadsPerBlock: 32, chunkBlocks: 10, residentThreads: 0)
        #expect(fixed.chunkBlocks == 3 && fixed.threads == 24 && fixed.gridBlocks == 1)
        // Blocks follow the block length: 33 rows are 5 blocks of 8.
        let eights = ChunkPlan(batch: 3, length: 33, blockLength: 8, lanesPerRow: 8, threadsPerBlock: 32, chunkBlocks: 10, residentThreads: 0)
        #expect(eights.chunkBlocks == 5 && eights.threads == 24)
        let empty = ChunkPlan(batch: 0, length: 0, blockLength: 16, lanesPerRow: 4, threadsPerBlock: 128, residentThreads: wave)
        #expect(empty.threads == 0 && empty.gridBlocks == 0)
    }

    @Test("a chunk plan refuses a chunk of no blocks")
    func chunkPlanMisuse() async {
        await #expect(processExitsWith: .failure) {
            _ = ChunkPlan(batch: 1, length: 16, blockLength: 16, lanesPerRow: 4, threadsPerBlock: 128, chunkBlocks: 0, residentThreads: 1)
        }
    }

    @Test("the layer's projection columns: b | c | v | a, 16-aligned vectors, stride a multiple of 8")
    func columns() {
        let full = PhalanxLayer.Columns(heads: 128, kvHeads: 128)
        #expect([full.b, full.c, full.v, full.a, full.width, full.stride] == [0, 2048, 4096, 6144, 6272, 6272])
        let grouped = PhalanxLayer.Columns(heads: 3, kvHeads: 1)
        #expect([grouped.b, grouped.c, grouped.v, grouped.a, grouped.width, grouped.stride] == [0, 16, 32, 80, 83, 88])
        for heads in 1...20 {
            let columns = PhalanxLayer.Columns(heads: heads, kvHeads: 1)
            #expect(columns.stride % 8 == 0 && columns.stride >= columns.width && columns.stride < columns.width + 8)
            #expect(columns.width == 2 * 16 + heads * 17)
        }
    }

    @Test("cuBLAS either loads or says where it was looked for")
    func cublasLoading() {
        if let reason = CUBLAS.unavailableReason {
            #expect(reason.contains("cuBLAS") && reason.contains("libcublas.so"))
        }
        #expect("\(CUBLASError(call: "cublasGemmEx", status: 15))" == "cublasGemmEx failed: CUBLAS_STATUS_NOT_SUPPORTED (15)")
        #expect(NumberFormat.bfloat16.cudaDataType == 14 && NumberFormat.float32.cudaDataType == 0)  // cudaDataType_t
    }

    @Test("the layer and exact-recurrence sources ship with their entry points")
    func layerSources() throws {
        #expect(Set(["jagged_window", "phalanx_layer", "exact_recurrence"]).isSubset(of: KernelSources.names))
        let layer = try KernelSources.source(named: "phalanx_layer"), exact = try KernelSources.source(named: "exact_recurrence")
        #expect(layer.contains("PHALANX_KERNELS(f32, Float32)") && layer.contains("PHALANX_KERNELS(bf16, BFloat16)"))
        #expect(exact.contains("EXACT_KERNELS(f32, Float32)") && exact.contains("void exact_scan("))
    }

    @Test("the layer and exact-recurrence kernels compile at the block lengths they take, and not at others (NVRTC, no GPU)",
          .enabled(if: NVRTCAvailable.yes, Comment(rawValue: "NVRTC not found: \(NVRTCAvailable.reason)")))
    func layerSourcesCompile() throws {
        let nvrtc = try NVRTC.shared.get()
        let base = try KernelSources.source(named: "jagged_window"), options = KernelSources.compileOptions(architecture: "sm_90")
        let layer = try KernelSources.source(named: "phalanx_layer"), exact = try KernelSources.source(named: "exact_recurrence")
        let builds = CUDAPhalanxKernels.blockLengths.map { ("phalanx_layer.cu", layer, $0) }
            + [("exact_recurrence.cu", exact, CUDAExactRecurrence.blockLength)]
        for (name, source, blockLength) in builds {
            let compiled = try nvrtc.compile(source: base + "\n" + source, name: name,
                                             options: options + KernelSources.definitions(blockLength: blockLength))
            #expect(Array(compiled.cubin.prefix(4)) == [0x7f, 0x45, 0x4c, 0x46], "\(name) l=\(blockLength)")
        }
        #expect(throws: NVRTCError.self) {  // rows load in groups of up to 8
            _ = try nvrtc.compile(source: base + "\n" + layer, name: "phalanx_layer.cu",
                                  options: options + KernelSources.definitions(blockLength: 12))
        }
    }
}
