package quiesce

import (
	"context"
	"os"
	"os/signal"
	"syscall"
	"time"
)

// Run is the whole life of the agent in one call, for main:
//
//   - under quiesce (QUIESCE_CONTROL_SOCKET set), it serves the control socket, lets the
//     supervisor drive the steps, and returns nil once close has replied (see Closed), having
//     removed the socket file;
//   - without a supervisor, it waits for SIGTERM (or SIGINT), runs the steps itself in order
//     with RunLocal(localBudget), and returns nil.
//
// Either way main should then return, so the process exits with code 0. If ctx is done first,
// Run stops serving and returns ctx.Err() without running any step. A socket that cannot be
// served is an error. Ready is closed once Run serves the socket or listens for the signals.
func (a *Agent) Run(ctx context.Context, localBudget time.Duration) error {
	srv, err := a.ServeFromEnv()
	if err != nil {
		return err
	}
	if srv != nil {
		defer srv.Shutdown()
		a.markReady()
		select {
		case <-a.Closed():
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, os.Interrupt)
	defer signal.Stop(signals)
	a.markReady()
	select {
	case sig := <-signals:
		a.logf("quiesce: %v without a supervisor: running the shutdown steps in-process", sig)
	case <-ctx.Done():
		return ctx.Err()
	}
	a.freeze()
	a.RunLocal(localBudget)
	return nil
}

// Ready is closed once Run is serving the control socket (under quiesce) or listening for
// SIGTERM (without a supervisor): from then on a stop is handled by the agent. A service that
// announces it has started (a log line, a readiness file) can wait for it.
func (a *Agent) Ready() <-chan struct{} { return a.ready }

func (a *Agent) markReady() { a.readyOnce.Do(func() { close(a.ready) }) }
