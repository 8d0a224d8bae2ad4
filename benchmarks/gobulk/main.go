// gobulk indexes a JSONL file with opensearch-go's BulkIndexer, as a Go user of the client would:
// one item per line, _id from the ipa_id field. Prints {"docs":N,"errors":N}; exit 1 on any error.
//
//	gobulk -url URL -index INDEX -workers 2 -flush-docs 5000 [-gzip] FILE
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"

	"github.com/opensearch-project/opensearch-go/v4"
	"github.com/opensearch-project/opensearch-go/v4/opensearchapi"
	"github.com/opensearch-project/opensearch-go/v4/opensearchutil"
)

func main() {
	url := flag.String("url", "http://127.0.0.1:9200", "cluster URL")
	index := flag.String("index", "bench", "target index")
	workers := flag.Int("workers", 2, "bulk requests in flight")
	flushDocs := flag.Int("flush-docs", 5000, "documents per request (turned into flush bytes from the first line's size)")
	flushBytes := flag.Int("flush-bytes", 0, "bytes per request; overrides -flush-docs")
	gzip := flag.Bool("gzip", false, "compress request bodies")
	flag.Parse()
	file, err := os.Open(flag.Arg(0))
	check(err)
	reader := bufio.NewReaderSize(file, 1<<20)
	client, err := opensearchapi.NewClient(opensearchapi.Config{Client: opensearch.Config{
		Addresses: []string{*url}, CompressRequestBody: *gzip}})
	check(err)
	var indexer opensearchutil.BulkIndexer
	docs := 0
	for {
		line, readErr := reader.ReadBytes('\n')
		if len(bytes.TrimSpace(line)) > 0 {
			var record struct {
				ID string `json:"ipa_id"`
			}
			check(json.Unmarshal(line, &record))
			if indexer == nil { // BulkIndexer flushes by bytes only: N documents of the first one's size
				if *flushBytes == 0 {
					*flushBytes = *flushDocs * (len(line) + len(*index) + len(record.ID) + 40)
				}
				indexer, err = opensearchutil.NewBulkIndexer(opensearchutil.BulkIndexerConfig{
					Client: client, Index: *index, NumWorkers: *workers, FlushBytes: *flushBytes})
				check(err)
			}
			check(indexer.Add(context.Background(), opensearchutil.BulkIndexerItem{
				Action: "index", DocumentID: record.ID, Body: bytes.NewReader(bytes.TrimRight(line, "\r\n"))}))
			docs++
		}
		if readErr != nil {
			break
		}
	}
	failed := uint64(0)
	if indexer != nil {
		check(indexer.Close(context.Background()))
		failed = indexer.Stats().NumFailed
	}
	fmt.Printf("{\"docs\":%d,\"errors\":%d}\n", docs, failed)
	if failed > 0 {
		os.Exit(1)
	}
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "gobulk:", err)
		os.Exit(2)
	}
}
