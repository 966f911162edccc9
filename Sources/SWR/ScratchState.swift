/// Pointers to the arrays of a `JaggedState` or `ExactState`, valid inside `withStatePointers`.
struct StatePointers {
    let local: UnsafeMutablePointer<Float>
    let gateProduct: UnsafeMutablePointer<Float>
    let carrier: UnsafeMutablePointer<Float>
    let offset: UnsafeMutablePointer<Int>
}

func withStatePointers<R>(_ state: inout JaggedState, _ body: (StatePointers) -> R) -> R {
    state.local.withUnsafeMutableBufferPointer { w in
        state.gateProduct.withUnsafeMutableBufferPointer { g in
            state.carrier.withUnsafeMutableBufferPointer { v in
                state.offset.withUnsafeMutableBufferPointer { o in
                    body(StatePointers(local: w.baseAddress!, gateProduct: g.baseAddress!,
                                       carrier: v.baseAddress!, offset: o.baseAddress!))
                }
            }
        }
    }
}

/// A work item's private copy of the jagged state for its heads (`heads.count` heads).
///
/// Items that cut one sequence's time axis each start from their own state (a halo), so the
/// shared state is read at the first chunk and written at the last one only.
struct ScratchState {
    let local: UnsafeMutablePointer<Float>
    let gateProduct: UnsafeMutablePointer<Float>
    let carrier: UnsafeMutablePointer<Float>
    let heads: Range<Int>
    let headDim: Int

    init(heads: Range<Int>, headDim: Int) {
        self.heads = heads
        self.headDim = headDim
        local = .allocate(capacity: heads.count * headDim)
        gateProduct = .allocate(capacity: heads.count)
        carrier = .allocate(capacity: heads.count * headDim)
    }

    func deallocate() {
        local.deallocate()
        gateProduct.deallocate()
        carrier.deallocate()
    }

    /// Copies sequence `s`'s state for this item's heads.
    func load(from state: StatePointers, sequence s: Int, heads H: Int, headDim D: Int) {
        let first = s * H + heads.lowerBound
        local.update(from: state.local + first * D, count: heads.count * D)
        carrier.update(from: state.carrier + first * D, count: heads.count * D)
        gateProduct.update(from: state.gateProduct + first, count: heads.count)
    }

    /// Writes this item's heads back into sequence `s`'s state.
    func store(to state: StatePointers, sequence s: Int, heads H: Int, headDim D: Int) {
        let first = s * H + heads.lowerBound
        (state.local + first * D).update(from: local, count: heads.count * D)
        (state.carrier + first * D).update(from: carrier, count: heads.count * D)
        (state.gateProduct + first).update(from: gateProduct, count: heads.count)
    }

    /// The state at a block start with no history: `w = 0`, `g = 1`, and `v = 0` if asked.
    func reset(carrier resetCarrier: Bool) {
        local.update(repeating: 0, count: heads.count * headDim)
        gateProduct.update(repeating: 1, count: heads.count)
        if resetCarrier { carrier.update(repeating: 0, count: heads.count * headDim) }
    }

    /// At a block end the terminal local state becomes the carrier and the block restarts.
    func endBlock() {
        carrier.update(from: local, count: heads.count * headDim)
        reset(carrier: false)
    }
}
